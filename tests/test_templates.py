"""Fidelity of templates + batched tokenization to docs/templates.md, against the rules applied by hand."""

from __future__ import annotations

import numpy as np
import pytest
from test_templates_tokenizers import gemma_tokenizer, llama3_tokenizer, qwen_path, qwen_tokenizer, train_bpe
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ovis_data.errors import OvisDataError
from ovis_data.pack.templates import GEMMA, LLAMA3, QWEN, ChatTemplateFormat, detect_chat_format
from ovis_data.pack.tokenize import SampleEncoder
from ovis_model.prompt import detect_template, generation_prompt, stop_ids

LONG = " ".join(f"step {i}: the model reads the image, then answers; " for i in range(600))

CONVERSATIONS = [
    # single turn, image at the start (the LLaVA layout)
    [("human", "<image>\nWhat is in the picture?"), ("gpt", "A red bus.")],
    # explicit system turn, multi-turn
    [
        ("system", "You answer briefly."),
        ("human", "What colour is the bus?\n<image>"),
        ("gpt", "Red."),
        ("human", "And the sky?"),
        ("gpt", "Blue, with a few clouds."),
    ],
    # image in the middle, several images
    [("human", "Compare <image> with <image> please."), ("gpt", "The first is larger.")],
    [("human", "<image><image><image>\nWhich one differs?"), ("gpt", "The third one.")],
    # image at the very end of a turn
    [("human", "Look at this: <image>"), ("gpt", " It is a cat. ")],
    # text only, unicode and emoji, values with surrounding white space and leading newlines
    [("human", "  Traduis: naïve café, Zürich, 東京 🐱🎉  "), ("gpt", "\n\nnaive cafe 🙂\n")],
    [("human", "Write code."), ("gpt", "\ndef f():\n    return '🐍'\n\n")],
    # very long answer
    [("human", "<image>\nExplain in detail."), ("gpt", LONG)],
    # empty answer (still supervises the end marker) and an image inside an answer
    [("human", "Say nothing."), ("gpt", "")],
    [("human", "Draw it."), ("gpt", "Here: <image> done.")],
    # several system-less turns starting with gpt
    [("gpt", "Hello! How can I help?"), ("human", "Describe <image>."), ("gpt", "A dog.")],
]


# --- the rules of docs/templates.md, applied by hand, one sample at a time ------------------------------
def tok_with_images(tok, text):
    ids = []
    chunks = text.split("<image>")
    for i, chunk in enumerate(chunks):
        ids += tok(chunk, add_special_tokens=False).input_ids
        if i < len(chunks) - 1:
            ids.append(-200)
    return ids


def by_hand_chat(tok, conv, fmt):
    if fmt == "qwen":
        roles = {
            "system": "<|im_start|>system\n",
            "human": "<|im_start|>user\n",
            "gpt": "<|im_start|>assistant\n",
        }
        end, bos, default, strip, drop_newline = (
            "<|im_end|>\n",
            None,
            "You are a helpful assistant.",
            False,
            True,
        )
    elif fmt == "llama3":
        roles = {
            "system": "<|start_header_id|>system<|end_header_id|>\n\n",
            "human": "<|start_header_id|>user<|end_header_id|>\n\n",
            "gpt": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        }
        end, bos, strip, drop_newline = "<|eot_id|>", "<|begin_of_text|>", True, False
        default = "You are a helpful and honest multimodal assistant."
    else:  # gemma
        roles = {"human": "<start_of_turn>user\n", "gpt": "<start_of_turn>model\n"}
        end, bos, default, strip, drop_newline = "<end_of_turn>\n", "<bos>", None, False, True
    turns = [{"from": f, "value": v} for f, v in conv]
    if default is not None and turns[0]["from"] != "system":
        turns.insert(0, {"from": "system", "value": default})
    gpt_role_len = len(tok(roles["gpt"], add_special_tokens=False).input_ids)
    input_ids, labels = [], []
    if bos:
        input_ids += tok(bos, add_special_tokens=False).input_ids
        labels += [-100] * len(input_ids)
    for turn in turns:
        value = turn["value"].strip() if strip else turn["value"]
        ids = tok_with_images(tok, roles[turn["from"]] + value + end)
        lab = [-100] * len(ids)
        if turn["from"] == "gpt":
            stop = len(ids) - 1 if drop_newline else len(ids)
            lab[gpt_role_len:stop] = ids[gpt_role_len:stop]
        input_ids += ids
        labels += lab
    labels = [-100 if x == -200 else x for x in labels]  # an image position is never supervised
    return input_ids, labels


def by_hand_caption(tok, caption, template="<image>'s caption: "):
    head, tail = template.split("<image>")
    text = caption.replace("<image>", "").strip()
    head_ids = tok(head, add_special_tokens=False).input_ids
    tail_ids = tok(tail, add_special_tokens=False).input_ids
    text_ids = tok(text, add_special_tokens=False).input_ids
    ids = head_ids + [-200] + tail_ids + text_ids
    return ids, [-100] * (len(ids) - len(text_ids)) + text_ids


def ours(encoder, convs):
    enc = encoder.encode_conversations([[f for f, _ in c] for c in convs], [[v for _, v in c] for c in convs])
    return enc, [tuple(a.tolist() for a in enc.sample(i)) for i in range(len(convs))]


@pytest.mark.parametrize(
    ("fmt", "make"), [("qwen", qwen_tokenizer), ("llama3", llama3_tokenizer)], ids=["qwen2.5", "llama3"]
)
def test_conversations_match_the_rules_by_hand(fmt, make):
    tok = make()
    encoder = SampleEncoder(tok, detect_chat_format(tok))
    enc, got = ours(encoder, CONVERSATIONS)
    assert not enc.errors
    for conv, (ids, labels) in zip(CONVERSATIONS, got, strict=True):
        want_ids, want_labels = by_hand_chat(tok, conv, fmt)
        assert ids == want_ids, conv
        assert labels == want_labels, conv
    # a second call hits the memo of repeated pieces and must give the same tokens
    assert ours(encoder, CONVERSATIONS[::-1])[1] == got[::-1]


def test_qwen_supervises_value_and_end_marker_but_not_the_newline():
    tok = qwen_tokenizer()
    enc, [(ids, labels)] = ours(SampleEncoder(tok, QWEN), [[("human", "Hi"), ("gpt", "Hello")]])
    supervised = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    assert tok.decode(supervised) == "Hello<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert tok.decode(ids).endswith("<|im_start|>assistant\nHello<|im_end|>\n")


def test_llama3_starts_with_bos_and_strips_values():
    tok = llama3_tokenizer()
    enc, [(ids, labels)] = ours(SampleEncoder(tok, LLAMA3), [[("human", "  Hi \n"), ("gpt", "\n Hello  ")]])
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>") and labels[0] == -100
    supervised = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    assert tok.decode(supervised) == "Hello<|eot_id|>"


def test_gemma_matches_the_rules_and_refuses_system_turns_per_sample():
    tok = gemma_tokenizer()
    fmt = detect_chat_format(tok)
    assert fmt is GEMMA
    convs = [c for c in CONVERSATIONS if c[0][0] != "system"]
    encoder = SampleEncoder(tok, fmt)
    enc, got = ours(encoder, convs)
    for conv, (ids, labels) in zip(convs, got, strict=True):
        assert (ids, labels) == by_hand_chat(tok, conv, "gemma")
    enc, got = ours(encoder, [convs[0], [("system", "Be brief."), ("human", "Hi"), ("gpt", "Yo")], convs[1]])
    assert list(enc.errors) == [1] and "system" in enc.errors[1]
    assert enc.lengths[1] == 0 and got[0] == by_hand_chat(tok, convs[0], "gemma")
    assert got[2] == by_hand_chat(tok, convs[1], "gemma")


CAPTIONS = [
    "A red bus parked beside a tall building.",
    "<image> a photo of a cat",
    "two dogs <image> on a beach <image>",
    "  café in Zürich at night 🌃  ",
    "",
    LONG,
]


@pytest.mark.parametrize("template", ["<image>'s caption: ", "Picture: <image>\nCaption:"])
def test_captions_match_the_rules_by_hand(template):
    tok = qwen_tokenizer()
    enc = SampleEncoder(tok).encode_captions(CAPTIONS, template)
    for i, caption in enumerate(CAPTIONS):
        ids, labels = enc.sample(i)
        want_ids, want_labels = by_hand_caption(tok, caption, template)
        assert ids.tolist() == want_ids
        assert labels.tolist() == want_labels
    assert enc.n_images.tolist() == [1] * len(CAPTIONS)  # a literal <image> in a caption is text
    assert enc.n_supervised[4] == 0  # empty caption: nothing to learn, the packer drops it


def test_per_sample_counts_agree_with_the_arrays():
    tok = qwen_tokenizer()
    enc, got = ours(SampleEncoder(tok, QWEN), CONVERSATIONS)
    assert enc.lengths.tolist() == [len(ids) for ids, _ in got]
    assert enc.n_images.tolist() == [ids.count(-200) for ids, _ in got]
    assert enc.n_supervised.tolist() == [sum(lab != -100 for lab in labels) for _, labels in got]
    assert enc.ids.dtype == np.int32 and enc.labels().dtype == np.int32


def test_format_is_chosen_from_the_tokenizer():
    assert detect_chat_format(qwen_tokenizer()) is QWEN
    assert detect_chat_format(llama3_tokenizer()) is LLAMA3
    assert detect_chat_format(qwen_tokenizer(), "qwen") is QWEN
    with pytest.raises(OvisDataError, match="test-llama3"):
        detect_chat_format(llama3_tokenizer(), "qwen")


def test_unknown_family_without_chat_template_is_an_error_naming_the_tokenizer():
    raw = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", name_or_path="my-odd-llm")
    with pytest.raises(OvisDataError, match="my-odd-llm"):
        detect_chat_format(tok)


QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_generic_chat_template_path_derives_the_chatml_labels():
    tok = AutoTokenizer.from_pretrained(qwen_path())
    tok.chat_template = QWEN2_CHAT_TEMPLATE  # the Qwen2 template: plain ChatML with a default system turn
    generic = SampleEncoder(tok, detect_chat_format(tok, "chat_template"))
    assert isinstance(generic.chat_format, ChatTemplateFormat)
    enc, got = ours(generic, CONVERSATIONS)
    assert list(enc.errors) == [len(CONVERSATIONS) - 1]  # opens with an answer: no header to derive
    fixed = ours(SampleEncoder(tok, QWEN), CONVERSATIONS[:-1])[1]
    for i, (conv, (ids, labels), (want_ids, want_labels)) in enumerate(
        zip(CONVERSATIONS[:-1], got[:-1], fixed, strict=True)
    ):
        assert ids == want_ids, i
        if conv[-1][1].startswith("\n"):
            # the header's "\n" and the answer's leading ones are one token in context: the generic path
            # supervises it (it holds answer text); the fixed format keeps the original rule (header
            # tokenized alone)
            diff = [k for k, (a, b) in enumerate(zip(labels, want_labels, strict=True)) if a != b]
            assert (
                len(diff) == 1
                and want_labels[diff[0]] == -100
                and tok.decode([ids[diff[0]]]).startswith("\n\n")
            )
        else:
            assert labels == want_labels, i


def test_generic_path_refuses_templates_that_rewrite_earlier_turns():
    # The shipped template is Qwen3-style: it drops earlier reasoning and adds an empty <think> block to
    # the last answer, so successive renderings are not prefixes: multi-turn samples are refused.
    generic = SampleEncoder(qwen_tokenizer(), detect_chat_format(qwen_tokenizer(), "chat_template"))
    enc, _ = ours(generic, CONVERSATIONS[:2])
    assert "prefix" in enc.errors[1]


def test_generation_prompt_opens_an_assistant_turn():
    prompt = QWEN.generation_prompt(["human"], ["<image> What is it?"])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image> What is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert LLAMA3.generation_prompt(["human"], ["Hi "]).endswith(
        "user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


# Vicuna-style: the assistant header ends in a space, which Qwen2.5's tokenizer merges into the next word.
VICUNA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + '<|endoftext|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)


def vicuna_tokenizer():
    tok = AutoTokenizer.from_pretrained(qwen_path())
    tok.chat_template = VICUNA_TEMPLATE
    return tok


def supervised_spans(ids, labels) -> list[list[int]]:
    spans, cur = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != -100:
            cur.append(t)
        elif cur:
            spans, cur = [*spans, cur], []
    return spans + ([cur] if cur else [])


def test_header_ending_in_white_space_supervises_the_answers_first_token():
    tok = vicuna_tokenizer()
    alone = tok("ASSISTANT: ", add_special_tokens=False).input_ids
    assert len(tok("ASSISTANT: Paris", add_special_tokens=False).input_ids) == len(alone)  # " Paris" merged
    convs = [
        [("human", "Capital of France?"), ("gpt", "Paris is the capital.")],
        [
            ("system", "Be brief."),
            ("human", "<image>\nWhat is it?"),
            ("gpt", "A red bus."),
            ("human", "Colour?"),
            ("gpt", "Red"),
        ],
    ]
    enc, got = ours(SampleEncoder(tok, detect_chat_format(tok, "chat_template")), convs)
    assert not enc.errors
    for conv, (ids, labels) in zip(convs, got, strict=True):
        answers = [v for f, v in conv if f == "gpt"]
        # every answer whole, from its first word (the space it took from the header) to the end marker
        assert [tok.decode(s) for s in supervised_spans(ids, labels)] == [
            f" {a}<|endoftext|>" for a in answers
        ]


def test_ovis_chat_prompts_such_a_model_as_it_was_trained():
    # a tokenizer with none of the fixed formats' special tokens, only its own template: chat_template
    own = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(["<|endoftext|>"], None), eos_token="<|endoftext|>"
    )
    own.chat_template = VICUNA_TEMPLATE
    assert detect_template(own) == "chat_template"
    tok = vicuna_tokenizer()  # Qwen2.5's real tokenizer with that template
    query = "<image>\nCapital of France?"
    text, ids = generation_prompt(tok, "chat_template", query)
    assert text.endswith("USER: <image>\nCapital of France?\nASSISTANT:")  # the space is the answer's
    enc = SampleEncoder(tok, detect_chat_format(tok, "chat_template"))
    train_ids, labels = enc.encode_conversations([["human", "gpt"]], [[query, "Paris."]]).sample(0)
    first = int(np.flatnonzero(labels != -100)[0])
    assert train_ids[:first].tolist() == ids  # training's tokens up to the first supervised one
    assert stop_ids(tok, "chat_template") == [tok.eos_token_id]
