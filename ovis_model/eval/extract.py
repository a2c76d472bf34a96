"""Which answer a model's text gives: rules only, never a guess (VLMEvalKit falls back to a judge LLM and
then to a random letter; here what no rule reads is counted as unmatched, and wrong).

Multiple choice (after VLMEvalKit's `can_infer_option` / `can_infer_text`, vlmeval/utils/matching_util.py):
1. the option letter: the text's words, with `.()[],:;!*#{}` read as spaces, name exactly one of the
   options' letters ("B", "(B)", "B. a cat", "The answer is B."): that letter;
2. else the option text: the text is at most twice as long as all the options' texts together and
   contains exactly one option's text (case-insensitive): that option;
3. else unmatched (also when several letters or several option texts appear: ambiguous).
Yes/no (VLMEvalKit's `YOrN_Extraction`, vlmeval/dataset/utils/yorn.py): "yes" among the words and not
"no": Yes; "no" and not "yes": No; else unmatched.
"""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[.()\[\],:;!*#{}]")
_WORDS = re.compile(r"[^\w\s']")


def extract_option(text: str, options: dict[str, str]) -> str | None:
    """The letter of the option `text` answers with, or None (see the module doc)."""
    words = set(_PUNCT.sub(" ", text).split())
    letters = [k for k in options if k in words]
    if len(letters) == 1:
        return letters[0]
    if letters:  # several letters: ambiguous, and option texts would not settle it honestly
        return None
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(v) for v in options.values()):
        return None
    found = [k for k, v in options.items() if v.lower() and v.lower() in lowered]
    return found[0] if len(found) == 1 else None


def extract_yes_no(text: str) -> str | None:
    words = set(_WORDS.sub(" ", text.lower()).split())
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return None
