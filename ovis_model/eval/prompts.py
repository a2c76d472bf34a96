"""The question a benchmark row becomes: VLMEvalKit's prompts for Ovis (vlmeval/vlm/ovis/ovis.py,
`build_multi_choice_prompt` and `build_yorn_prompt`), the ones the original's reported scores used.

Multiple choice: the hint (if any) and the question on separate lines, then one line per option
(`A. text`), then "Answer with the option's letter from the given choices directly." Yes/no: the question,
" Please answer yes or no." for HallusionBench, then "Answer the question using a single word or phrase."
(VLMEvalKit switches both instructions to Chinese for Chinese questions; so does this.) With one image the
query is `<image>\\n` + prompt; with several, the prompt then one `<image>` per line (VLMEvalKit's order
for Ovis: text first, then the images).
"""

from __future__ import annotations

import re

from ..constants import IMAGE_TOKEN

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MCQ_INSTRUCTION_CN = "请直接回答选项字母。"
YORN_INSTRUCTION = "Answer the question using a single word or phrase."
YORN_INSTRUCTION_CN = "请用单个词或短语回答问题。"
_CJK = re.compile(r"[\u4e00-\u9fff]")


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    text = f"{hint}\n{question}" if hint else question
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    return text + "\n" + (MCQ_INSTRUCTION_CN if is_chinese(text) else MCQ_INSTRUCTION)


def yorn_prompt(question: str, hallusionbench: bool = False) -> str:
    text = question + (" Please answer yes or no." if hallusionbench else "")
    return text + "\n" + (YORN_INSTRUCTION_CN if is_chinese(text) else YORN_INSTRUCTION)


def with_images(prompt: str, n_images: int) -> str:
    """The query with its image markers placed as VLMEvalKit places them for Ovis."""
    if n_images == 1:
        return f"{IMAGE_TOKEN}\n{prompt}"
    return "\n".join([prompt, *[IMAGE_TOKEN] * n_images])
