"""Inference prompts and training samples come from one chat-format definition: the prompt must be
exactly the training tokens of the same conversation up to the answer."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from ovis_data.pack.templates import detect_chat_format
from ovis_data.pack.tokenize import SampleEncoder, bundled_qwen_tokenizer_dir
from ovis_model.prompt import detect_template, generation_prompt


@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_generation_prompt_is_the_training_prefix(system):
    tok = AutoTokenizer.from_pretrained(bundled_qwen_tokenizer_dir())
    assert detect_template(tok) == "qwen"
    query, answer = "<image>\nWhat is in the picture? 🙂", "A cat."
    text, ids = generation_prompt(tok, "qwen", query, system)
    roles, texts = ["human", "gpt"], [query, answer]
    if system is not None:
        roles, texts = ["system", *roles], [system, *texts]
    encoded = SampleEncoder(tok, detect_chat_format(tok)).encode_conversations([roles], [texts])
    train_ids, labels = encoded.sample(0)
    assert list(train_ids[: len(ids)]) == ids
    assert np.all(labels[: len(ids)] == -100), "nothing of the prompt is supervised in training"
    assert text.endswith("<|im_start|>assistant\n") and ids.count(-200) == 1
